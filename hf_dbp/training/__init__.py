"""Training: `DBPTrainer` and its arguments, the matrix optimizers it offers, emissions, model cards, the Hub."""
