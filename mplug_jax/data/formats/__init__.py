"""The official mPLUG / mPLUG-2 annotation formats: readers (`base`) and TFDS builders (`builder`)."""
