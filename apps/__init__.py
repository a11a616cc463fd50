"""MONAI Deploy applications, one per clinical task (installed as radnode.apps); each packages as a MAP."""
