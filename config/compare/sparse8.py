# Sparse upcycling: 8 trainable copies of each FFN, top-2, + attention LoRA.
method = "sparse"
n_experts = 8
top_k = 2
