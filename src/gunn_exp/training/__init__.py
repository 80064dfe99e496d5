"""Training: the LightningModule, train(cfg), and what makes a run resumable and observable."""
