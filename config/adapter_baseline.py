# The paper's baseline without experts, with adapters: the same recipe as PESC, one adapter per FFN.
# python train.py config/adapter_baseline.py
out_dir = "out-adapter"
method = "adapter"
