"""prunetune.trainers"""
