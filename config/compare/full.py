# Full fine-tune of every weight, no experts (an upper reference, not a parameter-efficient method).
method = "full"
