# One adapter per FFN with as many trainable parameters as PESC E=8 (r = 16): rank 8 * 16 + 4 = 132
# matches the 8 adapters (8 * 2 * d * 16) plus the router (d * 8) of each layer exactly. The fair
# control for "is it the experts, or just more trainable parameters?"
method = "adapter"
adapter_dim = 132
