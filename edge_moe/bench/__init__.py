"""`edge-moe bench`: measurements that print a table and can write JSON. Ratios are taken within one run
because this class of machine is noisy."""
