# PESC with 8 adapter experts, top-2, + attention LoRA.
method = "pesc"
n_experts = 8
top_k = 2
