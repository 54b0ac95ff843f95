# PESC with 4 adapter experts, top-2, + attention LoRA.
# Shared by every run of the comparison (python compare.py): same base, data, steps and schedule.
max_iters = 400
eval_interval = 50
n_val = 300
n_samples = 0
learning_rate = 3e-3
method = "pesc"
n_experts = 4
top_k = 2
