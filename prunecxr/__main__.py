from prunecxr.cli import main

main()
