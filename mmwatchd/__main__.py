from mmwatchd.cli import entry

entry()
