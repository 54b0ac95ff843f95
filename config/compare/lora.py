# The paper's baseline without experts, "Camel": the same base tuned with LoRA on every linear layer (attention
# and FFN), no adapters, no experts.
method = "lora"
lora_targets = "all"
