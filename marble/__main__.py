from marble.cli import main

main()
