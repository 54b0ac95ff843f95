# Dense baseline: full fine-tune of every weight, no experts.
method = "dense"
