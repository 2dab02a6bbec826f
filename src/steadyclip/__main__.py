from steadyclip.cli import main

main()
