# PESC on real GPT-2 (124M), instruction-tuned on Stanford Alpaca, on one GPU.
#   python train.py config/gpt2_pesc.py
# Downloads once (into ~/.cache/pesc, $PESC_CACHE moves it): the gpt2 repo's config, tokenizer files and
# weights from the Hugging Face hub, and alpaca_data.json from the Stanford Alpaca repository. Offline,
# the error message names the files and the folder to put them in (README, "Upcycle real GPT-2").
#
# Worked out from the parameter counts (python compare.py --sizes prints them):
#   total 134.4M (dense 124.4M), trainable 9.95M (adapters 9.44M + routers 74K + LoRA 442K), active 127.3M.
#   Memory: fp32 weights 0.54 GB + grads and AdamW moments of the trainable part 0.12 GB; activations
#   under bf16 autocast ~0.6 MB per token (12 layers) -> a 16 x ~300-token micro-batch ~3 GB, plus
#   ~2 GB of fp32 logits and their gradient over the 50257-token vocabulary: ~6 GB in all.
#   Time: a tuned token costs 4 x 127M (forward + input gradients) + 2 x 10M (weight gradients) + 12 L T d
#   (attention) = ~0.57 GFLOP; Alpaca is ~52K examples x ~250 tokens = ~13M tokens per epoch = ~7 PFLOP:
#   ~1 min at 100 TFLOP/s sustained (H100 at ~10 % MFU, usual for a 124M model). Estimates, not measurements.
out_dir = "out-gpt2-pesc"
init_from = "gpt2"
dataset = "alpaca"
block_size = 512            # the paper's sequence length; Alpaca examples are shorter than this
method = "pesc"
n_experts = 8
top_k = 2
adapter_dim = 64
adapter_scale = 1.0
lora_rank = 8
lora_alpha = 16.0
batch_size = 16
gradient_accumulation_steps = 2
max_iters = 1600            # ~1 epoch of Alpaca (52K examples / 32 per step)
learning_rate = 2e-4        # the paper's recipe: lr 2e-4, 3 % warmup, no weight decay
warmup_frac = 0.03
weight_decay = 0.0
eval_interval = 200
n_val = 200
eval_max_new_tokens = 64
torch_compile = True
