from bcpkd_cli.cli import main

main()
