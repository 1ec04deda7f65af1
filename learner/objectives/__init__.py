"""Training objectives: one small module each (config dataclass + loss), one shared loop."""
