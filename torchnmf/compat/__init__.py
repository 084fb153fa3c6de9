"""Adapters giving the APIs of the seed packages over torchnmf's layers and trainers.

Each adapter translates names and defaults only; the algorithms are the core ones.
"""
