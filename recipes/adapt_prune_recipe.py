"""placeholder"""
print("adapt_prune_recipe placeholder")
