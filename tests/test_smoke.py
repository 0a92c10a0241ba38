"""The shortest walk through the API: proves the fixtures and the wiring."""


def test_user_creates_room_and_chats(alice):
    token = alice.post("/room", {"roomType": 2, "roomName": "Team"}, status=201).data["token"]
    alice.post(f"/room/{token}/participants/active", status=200)
    sent = alice.post(f"/chat/{token}", {"message": "hi"}, status=201).data
    received = alice.get(f"/chat/{token}", {"timeout": 0}, status=200).data
    assert received == [sent]
