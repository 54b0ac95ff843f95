# The paper's dense baseline with adapters: one adapter per FFN + attention LoRA = PESC with E=1, k=1.
method = "adapter"
