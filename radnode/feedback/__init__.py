"""The feedback loop: clinicians' corrections of the node's results, matched to their jobs and measured.

==================== =======================================================================================
``agreement``        per-segment Dice, volume difference (mL, %) and HD95 (MONAI's metrics)
``corrections``      matching a corrected SEG to the job whose SEG it corrects (the node's feedback thread)
==================== =======================================================================================
"""
