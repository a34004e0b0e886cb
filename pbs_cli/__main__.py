from pbs_cli.app import main

main()
