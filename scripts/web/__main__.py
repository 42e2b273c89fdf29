from scripts.web import main

main()
