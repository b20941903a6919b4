"""``fedpersona audit``: what the system promises (the ledgers, the wire) and what an
attacker learns (canaries, membership inference), with the statistics behind each bound."""
