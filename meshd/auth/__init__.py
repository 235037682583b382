"""Auth: accounts, rules and PASETO v4.public tokens, checked on every node."""
