"""distillguard: access control, metering, a tamper-evident ledger and distillation
defence for OpenAI-compatible model APIs."""

__version__ = "0.1.0"
