"""What runs and what it means: the scheduler, the block manager and the post-step stages.

Sequences, the step plan, output processing, and the stages (n/best_of, choices, pooling): pure
Python, no torch modules, so the step's logic is tested without a device.
"""
