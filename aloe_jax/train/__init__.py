"""One trainer loop shared by SFT and DPO, its losses, checkpoints and metrics."""
