# PESC E=8 on a 4-bit NF4 base (the QLoRA recipe's base): the same run as pesc8.py, frozen
# attention and FFN projections stored in 4 bits.
method = "pesc"
n_experts = 8
top_k = 2
quantize_base = True
