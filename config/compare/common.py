# Shared by every run of the comparison: same base, data, steps and schedule.
# python compare.py runs: python train.py config/compare/common.py config/compare/<method>.py --seed=S
max_iters = 400
eval_interval = 50
n_val = 300
n_samples = 0
learning_rate = 3e-3
