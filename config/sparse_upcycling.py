# Sparse upcycling (Komatsuzaki et al., 2022): 8 trainable copies of each FFN, top-2, same router.
# python train.py config/sparse_upcycling.py
out_dir = "out-sparse"
method = "sparse"
n_experts = 8
top_k = 2
learning_rate = 1e-3
