# PESC on SmolLM2-135M (a Llama-architecture base), instruction-tuned on Stanford Alpaca, on one GPU.
#   python train.py config/smollm2_pesc.py
#   python train.py config/smollm2_pesc.py --init_from=HuggingFaceTB/SmolLM2-360M   # the next size
# Downloads once into ~/.cache/pesc: the repo's config.json, tokenizer.json (its own byte-level BPE,
# built as a tiktoken encoding) and model.safetensors (269 MB, bf16), and alpaca_data.json.
#
# Worked out from the parameter counts (python compare.py --sizes):
#   dense 134.5M (d 576, 30 layers, 9 heads / 3 kv heads, SwiGLU 1536, vocab 49152, tied head).
#   PESC E=8, r=64 + LoRA r=8 on q,k,v,o: total 153.3M, trainable 18.75M (adapters 17.69M + routers 0.14M
#   + LoRA 0.92M), active per token 140.0M.
#   Memory: fp32 weights 0.61 GB + grads and AdamW moments of the trainable part 0.23 GB; bf16 activations
#   ~0.54 MB per token (30 layers) -> 16 x 512 tokens at most ~4.4 GB, plus ~3.2 GB of fp32 logits and
#   their gradient over the 49152-token vocabulary: ~9 GB at most (Alpaca's examples are shorter than 512).
#   Time: ~0.7 GFLOP per tuned token (4 x 140M + 2 x 19M + attention); one Alpaca epoch (~10M tokens)
#   ~7 PFLOP: about a minute at 100 TFLOP/s. Estimates, not measurements.
out_dir = "out-smollm2-pesc"
init_from = "HuggingFaceTB/SmolLM2-135M"
dataset = "alpaca"
block_size = 512
method = "pesc"
n_experts = 8
top_k = 2
adapter_dim = 64
lora_rank = 8
batch_size = 16
gradient_accumulation_steps = 2
max_iters = 1600            # ~1 epoch of Alpaca
learning_rate = 2e-4        # the paper's recipe: lr 2e-4, 3 % warmup, no weight decay
warmup_frac = 0.03
eval_interval = 200
n_val = 200
eval_max_new_tokens = 64
