"""What the student sees: its input channels, modality dropout and simulated low-dose CT (REACT-KD).

The teacher always sees the full, clean input; everything here changes the student's input only, inside the
trainer's train_step (after nnU-Net's augmentation), so nnU-Net's data pipeline stays untouched.
"""
