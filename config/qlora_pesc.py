# The paper's training recipe (train_moe.py of the official code) on any base, as far as this project
# implements it: the frozen base in 4-bit NF4 with double quantization, LoRA r=64 / alpha=16 / dropout
# 0.1 on every linear layer of each block (attention and the shared FFN), adapter experts E=8, top-2,
# r=64 with dropout 0.1 inside each expert, lr 2e-4, gradient checkpointing.
#   python train.py config/smollm2_pesc.py config/qlora_pesc.py
quantize_base = True
lora_rank = 64
lora_alpha = 16.0
lora_dropout = 0.1
lora_targets = "all"
n_experts = 8
top_k = 2
adapter_dim = 64
adapter_dropout = 0.1
learning_rate = 2e-4
grad_clip = 0.3
grad_checkpointing = True
