"""Trainers: :class:`torch.optim.Optimizer` subclasses whose ``step(closure)`` takes a closure.

One trainer per file; they see parameters, a closure and (for conjugate layers) the layer's
statistics method, never a layer's class.
"""
# -- each trainer's owner adds its import line below --
