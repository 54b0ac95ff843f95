# PESC with 4 adapter experts, top-2, + attention LoRA.
method = "pesc"
n_experts = 4
top_k = 2
