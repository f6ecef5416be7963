"""Rules: vectorised health points and frailty-risk flags."""
