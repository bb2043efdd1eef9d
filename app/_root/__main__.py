from triforce_chat.app.cli import main

main()
