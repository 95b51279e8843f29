"""Write a step's new keys and values into their slots of the paged KV cache."""
