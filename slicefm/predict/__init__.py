"""Apply a trained model (fold heads + their encoder + the recorded preprocessing) to new CT scans."""
