"""Pipeline definitions and routing rules (installed as radnode.pipelines)."""
