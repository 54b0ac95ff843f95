# PESC with 16 adapter experts, top-2, + attention LoRA.
method = "pesc"
n_experts = 16
top_k = 2
