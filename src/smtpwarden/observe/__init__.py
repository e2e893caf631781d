"""What smtpwarden tells its operator: transaction logs (and later metrics)."""
