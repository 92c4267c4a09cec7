"""A procedural tabletop world for training and evaluating a small learned VLA on CPU.

``scene`` draws the world, ``sim`` steps it and judges tasks, ``expert`` is the scripted
demonstrator, ``dataset`` turns expert rollouts into (image, instruction, action) samples.
"""
