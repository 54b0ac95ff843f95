# Sparse upcycling: 8 trainable copies of each FFN, top-2, + attention LoRA.
# Shared by every run of the comparison (python compare.py): same base, data, steps and schedule.
max_iters = 400
eval_interval = 50
n_val = 300
n_samples = 0
learning_rate = 3e-3
method = "sparse"
n_experts = 8
top_k = 2
