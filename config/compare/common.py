# Shared by every run of the comparison: same base, data, steps and schedule.
# python compare.py runs: python train.py config/compare/common.py config/compare/<method>.py --seed=S
max_iters = 400
eval_interval = 50
n_val = 300
n_samples = 0
learning_rate = 3e-3
# adapters r = d/8 = 16, the released Camelidae models' ratio (r = 512 at d = 4096); at r = 32 the
# E = 8 masked path computes E*r = 256 columns, half the FFN's width, on top of the FFN
adapter_dim = 16
