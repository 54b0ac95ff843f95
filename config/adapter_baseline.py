# The paper's dense baseline ("Camel"): the same recipe as PESC, one adapter per FFN, no experts.
# python train.py config/adapter_baseline.py
out_dir = "out-adapter"
method = "adapter"
