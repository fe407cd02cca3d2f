"""Server side: ServerApp, run loop glue, checkpoints and centralized evaluation."""
