from lenscap.cli import main

main()
