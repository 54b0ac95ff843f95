# The paper's baseline without experts, with adapters: one adapter per FFN + attention LoRA = PESC with E=1, k=1.
method = "adapter"
