from leanserve.cli import main

main()
